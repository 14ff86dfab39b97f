//! Pure HTTP/1.x: request-head parsing, body framing and response heads. No sockets here.
