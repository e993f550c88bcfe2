"""Generated gRPC code for the n2g.v1 API (built from proto/n2g/v1/*.proto by `make`; not edited by hand)."""
