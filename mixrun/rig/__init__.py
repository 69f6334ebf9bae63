"""Rigs: the profile format (:mod:`.profile`: schema, TOML, validation, lookup) and this machine's discovery
(:mod:`.discover`)."""
