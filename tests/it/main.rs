//! Integration tests: the real `baton` binary in front of real worker processes, on loopback only.

mod admin;
mod canary;
mod cli;
mod client_address;
mod data_path;
mod deploy;
mod drain;
mod faults;
mod lifecycle;
mod manager;
mod reexec;
mod resend;
mod security;
mod support;
mod upgrade;
