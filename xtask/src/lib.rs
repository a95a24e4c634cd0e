//! xtask's library: the testbed that the demo, the end-to-end tests and the benchmarks share.

pub mod manifests;
pub mod testbed;
