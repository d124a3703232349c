"""Testing utilities: spawned gloo ranks, a reference GPT and the compiled-vs-eager parity harness."""
