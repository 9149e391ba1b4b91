"""Per-app API keys with scopes; only hashes of secrets are stored."""
