//! The one integration-test binary (ripgrep style): each module below is a feature area.

mod frameworks;
mod http;
mod prefork;
mod wsgi;
