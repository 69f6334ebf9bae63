"""Curated rig profiles (``*.toml``, format ``mixrun-profile/1``) shipped with mixrun."""
