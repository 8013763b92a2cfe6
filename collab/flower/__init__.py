"""Federated training across machines on Flower: node.py (a node's local update on its
own data), server.py (the rounds over nodes), apps.py (the Flower ServerApp and
ClientApp; needs the `flower` extra) and local.py (a whole federation on localhost)."""
