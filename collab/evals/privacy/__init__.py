"""Privacy audits: canary exposure and membership inference."""
