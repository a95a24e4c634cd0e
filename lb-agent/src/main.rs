#![allow(dead_code)]
mod model;
fn main() {}
