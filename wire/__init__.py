"""What client and server share about tensor bytes: dtypes, chunked streams and aligned layouts.

No module here imports the generated protobuf code or either side's package,
so domain code on the server (registry, optimizer, storage) may use it.
"""
