"""Property tests draw the same examples on every run (derandomize): a red CI run is a reproducible one, and new
inputs are found by raising max_examples locally, not by chance in CI."""
from hypothesis import settings

settings.register_profile('repeatable', derandomize=True)
settings.load_profile('repeatable')
