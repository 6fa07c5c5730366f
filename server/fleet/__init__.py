"""Concentric on Ray Serve: an ingress replica (the API) in front of engine replicas."""
