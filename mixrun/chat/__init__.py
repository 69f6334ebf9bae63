"""``mixrun chat``: the conversation and answer loop (:mod:`.conversation`) and the terminal REPL (:mod:`.repl`)."""
