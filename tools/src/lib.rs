//! Splitvisor tools.
