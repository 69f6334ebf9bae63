"""Models: the spec values (:mod:`.spec`), the one bounded GGUF reader (:mod:`.gguf`) and its HTTP byte source
(:mod:`.remote`)."""
