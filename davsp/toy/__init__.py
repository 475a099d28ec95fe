"""The embedded safety world: a small trained LLaVA whose behaviour mirrors the DAVSP setting."""
