"""The webhook delivery kind: signed HTTP POST/PUT to an owner's endpoint (SPEC §5)."""
