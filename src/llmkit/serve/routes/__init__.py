"""The API's routes, one module per group, each an `APIRouter` whose handlers take the app's `State` (`get_state`):

models.py       GET /health, /metrics, /v1/models, /v1/models/{id}
generation.py   POST /v1/chat/completions, /v1/completions
embeddings.py   POST /v1/embeddings
tokens.py       POST /tokenize, /detokenize
arena.py        the votes API: /arena/battles, /arena/votes, /ratings, /arena/leaderboard, /applications
page.py         GET / (the web page) and /favicon.ico; its files are served under /ui/ by the app
"""
