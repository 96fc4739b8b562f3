"""The `demo` tour and what it needs: a throwaway redis-server and simulated workers.

Off the daemon's import path; the tests use `redis_server` and `simworker` too.
"""
