"""Training settings: single, centralized, federated, incremental."""
