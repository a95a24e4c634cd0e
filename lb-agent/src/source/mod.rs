//! Sources of Services, EndpointSlices and this node's Node: the Kubernetes API ([`kube`]) and
//! manifest files ([`manifest`]). Each turns what it reads into the model's [`Event`]s, sends them
//! to the reconcile loop in [`Batch`]es, and reports its own problems (a watch that fails; a file,
//! document, object or field that cannot be used).

pub mod kube;
pub mod manifest;

use std::{collections::BTreeMap, path::Path, sync::Arc, time::Duration};

use crate::model::{Event, ObjectRef};

/// What a source read since its last batch.
#[derive(Debug, Default)]
pub struct Batch {
    pub events: Vec<Event>,
    /// Where the objects named here are now defined (`None`: nowhere any more), so the model's
    /// problems about them can name the file. The Kubernetes API sends none.
    pub origins: BTreeMap<ObjectRef, Option<Arc<Path>>>,
    /// The source has read a complete view once (every list done; every file read): from here
    /// on the model may be programmed.
    pub synced: bool,
    /// Set when this batch is a read of the manifests, with the time it took: every read is
    /// logged as a sync, even one that changes nothing.
    pub read: Option<Duration>,
}
