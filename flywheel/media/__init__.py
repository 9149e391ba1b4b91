"""Images named by URI: where the server may read them from, and reading them safely."""
