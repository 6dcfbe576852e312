"""`longserve bench serve`: a load tester for OpenAI-compatible servers (vLLM's style).

datasets → arrivals → client (streaming HTTP) → metrics → report / plot.
"""
