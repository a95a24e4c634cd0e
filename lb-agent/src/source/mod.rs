//! Sources of Services, EndpointSlices and this node's Node: the Kubernetes API ([`kube`]) and
//! manifest files ([`manifest`]). Each turns what it reads into the model's [`Event`]s, sends them
//! to the reconcile loop in [`Batch`]es, and reports its own problems (a watch that fails; a file,
//! document, object or field that cannot be used).

pub mod kube;
pub mod manifest;

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use crate::model::{Event, ObjectRef};

/// What a source read since its last batch.
#[derive(Debug, Default)]
pub struct Batch {
    pub events: Vec<Event>,
    /// The source has read a complete view once (every list done; every file read): from here
    /// on the model may be programmed.
    pub synced: bool,
    /// Set when this batch is a read of the manifests, with the time it took: every read is
    /// logged as a sync, even one that changes nothing.
    pub read: Option<Duration>,
    /// When the change in `events` happened, as far as the source knows: an EndpointSlice's
    /// `endpoints.kubernetes.io/last-change-trigger-time` (when the EndpointSlice controller saw
    /// the Pod or Service change), otherwise when the source saw it. Where the network
    /// programming latency starts; `None` for (re-)lists.
    pub changed_at: Option<SystemTime>,
}

/// Which manifest files define each object, in name order (the last one's version is in effect).
/// The manifest source keeps it; the reconcile loop reads it to name the file in messages about an
/// object. One map, shared, rather than a copy in each.
#[derive(Clone, Default)]
pub struct Origins(Arc<Mutex<BTreeMap<ObjectRef, Vec<Arc<Path>>>>>);

impl Origins {
    /// The file whose version of `object` is in effect.
    pub fn of(&self, object: &ObjectRef) -> Option<Arc<Path>> {
        self.lock().get(object)?.last().cloned()
    }

    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<ObjectRef, Vec<Arc<Path>>>> {
        // Nothing panics while holding it; a poisoned map is still a valid one.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}
