//! Which of a Service port's endpoints this node uses: kube-proxy's rules
//! (`pkg/proxy/topology.go`: `CategorizeEndpoints` and `topologyModeFromHints`).
//!
//! - `internalTrafficPolicy: Local`: only endpoints on this node; ready ones, else serving and
//!   terminating ones; none means connects are refused.
//! - Otherwise, topology: when every ready endpoint carries node hints and one is for this node,
//!   only endpoints hinted for this node are used; else, when every ready endpoint carries zone
//!   hints and one is for this node's zone, only those hinted for the zone. Any ready endpoint
//!   without a hint, or no hint for this node or zone, means all endpoints are used. As in
//!   kube-proxy, the hints decide, not the Service's `trafficDistribution` (the EndpointSlice
//!   controller writes node hints only for `PreferSameNode`).
//! - Ready endpoints first; when none is ready anywhere, the serving and terminating ones.

use std::collections::BTreeSet;

use super::{Backend, NodeContext};

/// An endpoint with what the rules look at, borrowed from its slice.
#[derive(Clone, Copy, Debug)]
pub(super) struct Candidate<'a> {
    pub backend: Backend,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node_name: Option<&'a str>,
    pub zone_hints: &'a BTreeSet<String>,
    pub node_hints: &'a BTreeSet<String>,
}

impl Candidate<'_> {
    pub fn is_on(&self, node: &NodeContext) -> bool {
        node.name.is_some() && self.node_name == node.name.as_deref()
    }
}

/// The Service settings the rules depend on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub(super) struct Policy {
    /// `internalTrafficPolicy: Local`.
    pub local: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum TopologyMode {
    All,
    SameZone,
    SameNode,
}

pub(super) fn select(
    candidates: &[Candidate],
    policy: Policy,
    node: &NodeContext,
) -> BTreeSet<Backend> {
    let pick = |keep: &dyn Fn(&Candidate) -> bool| -> BTreeSet<Backend> {
        candidates
            .iter()
            .filter(|c| keep(c))
            .map(|c| c.backend)
            .collect()
    };
    let serving_terminating = |c: &Candidate| c.serving && c.terminating;

    if policy.local {
        let is_local = |c: &Candidate| c.is_on(node);
        let ready = pick(&|c| is_local(c) && c.ready);
        if !ready.is_empty() {
            return ready;
        }
        return pick(&|c| is_local(c) && serving_terminating(c));
    }

    let mode = topology_mode(candidates, node);
    let ready = pick(&|c| c.ready && available(c, mode, node));
    if !ready.is_empty() {
        return ready;
    }
    // The topology mode is only ever narrower than "all" when a ready endpoint matched it, so
    // getting here means nothing is ready anywhere.
    pick(&serving_terminating)
}

fn topology_mode(candidates: &[Candidate], node: &NodeContext) -> TopologyMode {
    let ready: Vec<&Candidate> = candidates.iter().filter(|c| c.ready).collect();
    let hinted = |hints: for<'c> fn(&'c Candidate) -> &'c BTreeSet<String>,
                  wanted: Option<&String>| {
        let all_hinted = ready.iter().all(|c| !hints(c).is_empty());
        let any_for_us = wanted.is_some_and(|w| ready.iter().any(|c| hints(c).contains(w)));
        all_hinted && any_for_us
    };
    if hinted(|c| c.node_hints, node.name.as_ref()) {
        return TopologyMode::SameNode;
    }
    if hinted(|c| c.zone_hints, node.zone.as_ref()) {
        return TopologyMode::SameZone;
    }
    TopologyMode::All
}

fn available(c: &Candidate, mode: TopologyMode, node: &NodeContext) -> bool {
    match mode {
        TopologyMode::All => true,
        TopologyMode::SameZone => node.zone.as_ref().is_some_and(|z| c.zone_hints.contains(z)),
        TopologyMode::SameNode => node.name.as_ref().is_some_and(|n| c.node_hints.contains(n)),
    }
}
