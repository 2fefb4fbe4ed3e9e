"""The service layer: the policy both bindings share, on top of the wire layer."""
