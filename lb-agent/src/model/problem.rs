//! Problems: what the model could not use, named by object and field so a person can fix it.

use std::fmt;

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

/// A Kubernetes object by kind, namespace and name: what `kubectl` considers the same object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
}

impl ObjectRef {
    pub fn service(svc: &Service) -> Self {
        Self::new("Service", &svc.metadata.namespace, &svc.metadata.name)
    }

    pub fn endpoint_slice(slice: &EndpointSlice) -> Self {
        Self::new(
            "EndpointSlice",
            &slice.metadata.namespace,
            &slice.metadata.name,
        )
    }

    pub fn new(kind: &'static str, namespace: &Option<String>, name: &Option<String>) -> Self {
        Self {
            kind,
            namespace: namespace.clone().unwrap_or_default(),
            name: name.clone().unwrap_or_default(),
        }
    }
}

impl fmt::Display for ObjectRef {
    /// `Service shop/web`; a cluster-scoped object (a Node) without the slash: `Node node-a`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            "Node" => write!(f, "{} {}", self.kind, self.name),
            _ => write!(f, "{} {}/{}", self.kind, self.namespace, self.name),
        }
    }
}

/// Something in an object the model had to skip.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Problem {
    pub object: ObjectRef,
    /// Path of the offending field, as in `kubectl explain` (`spec.ports[1].port`).
    pub field: String,
    pub message: String,
}

impl Problem {
    pub fn new(object: ObjectRef, field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            object,
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.object, self.field, self.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_are_named_as_kubectl_names_them() {
        let name = |kind, namespace: &str| {
            ObjectRef::new(kind, &Some(namespace.to_owned()), &Some("a".to_owned())).to_string()
        };
        assert_eq!(name("Service", "shop"), "Service shop/a");
        assert_eq!(name("Node", ""), "Node a", "a Node has no namespace");
    }
}
