import os
import tempfile

# Tests never write into the user's cache: one native-code cache per test session.
os.environ.setdefault("POPDSL_CACHE_DIR", tempfile.mkdtemp(prefix="popdsl-cache-"))
# Every compile in the tests runs the verifier after every pipeline stage.
os.environ["POPDSL_VERIFY"] = "1"
