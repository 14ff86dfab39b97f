//! The one integration-test binary (ripgrep style): each module below is a feature area.

mod balance;
mod differential;
mod frameworks;
mod hardening;
mod http;
mod lifecycle;
mod options;
mod prefork;
mod profiler;
mod readme;
mod wheel;
mod wsgi;
