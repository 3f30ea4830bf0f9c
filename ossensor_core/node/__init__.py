"""The node: its interfaces and how they are selected, its routes and workloads."""
