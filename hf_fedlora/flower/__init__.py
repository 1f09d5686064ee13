"""Flower apps (extra `hf-fedlora[flower]`): the same methods and privacy across processes and machines.

`hf_fedlora.flower.client:app` (ClientApp) and `hf_fedlora.flower.server:app` (ServerApp) on Flower's
Message API; each client's privacy ledger lives on its own disk (`hf_fedlora.flower.ledger`). Name them
in an app's pyproject.toml (see examples/flower).
"""
