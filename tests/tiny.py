"""Small scenarios for the tests of the main job: the embedded OPT model on a few held-out tokens, a tiny probe."""


def scenario(name: str, tokens: int, window: int = 4, engine: str = "", model: str = "") -> str:
    """A scenario file's text; `engine` and `model` add lines to those tables."""
    return f"""
name = "{name}"
[engine]
window = {window}
threads = 4
{engine}
[probe]
chunk_kib = [4, 64]
threads = [1, 4]
ioengines = ["psync"]
seconds = 0.2
file_mib = 8
[[models]]
name = "shakespeare-opt"
tokens = {tokens}
greedy_prompt = 8
greedy_tokens = 8
counts_tokens = 4096
{model}
"""
