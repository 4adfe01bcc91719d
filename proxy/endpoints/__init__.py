"""HTTP endpoints: one module per API area, each exposing `routes(gateway)`."""
