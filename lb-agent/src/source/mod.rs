//! Sources of Services and EndpointSlices. Each is a thin shell: it hands objects to the model and
//! says where they came from, so problems can name them.

pub mod kube;
pub mod manifest;
