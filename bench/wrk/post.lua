-- wrk script for the POST echo benchmark: every request sends the same 1 KiB body.
wrk.method = "POST"
wrk.body = string.rep("forkscope-bench!", 64)
wrk.headers["Content-Type"] = "application/octet-stream"
