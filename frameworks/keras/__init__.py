"""optserve for Keras 3: (in progress)."""
