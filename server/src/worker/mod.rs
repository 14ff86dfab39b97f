//! One worker process: the event loop, its connections, and request dispatch to the app.
