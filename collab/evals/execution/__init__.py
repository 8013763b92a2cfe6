"""Running generated code: the bubblewrap sandbox and its fork server, and pass@k."""
