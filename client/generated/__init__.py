"""Generated from proto/optserve/v1 by `make proto`; do not edit."""
