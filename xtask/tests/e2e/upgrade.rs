//! Upgrades and rollbacks of the agent, as a DaemonSet rolling update makes them: the running
//! agent stops, another version starts over the same pins, and so on. Two clients connect without
//! pause the whole time; none may fail, and the maps end up as a fresh start of the version left
//! running would write them.
//!
//! The versions: the last commit before versioned map layouts (layout 1, pinned where version 1's
//! are, and no notion of versions: it attaches its programs before its first sync); the last
//! commit of layout 2 (session affinity); this tree (layout 3: per-frontend counters); and this
//! tree built with `layout-test` (the next layout).

use std::{path::Path, thread, time::Duration};

use anyhow::{Context as _, ensure};
use lb_agent::dataplane::bpf::pinned_layouts;
use lb_common::LAYOUT_VERSION;
use xtask::testbed::{PodSpec, Testbed, agent, builds, probe::Attempt};

use super::{HTTP, probe_web_for, testbed, web_manifest};

/// The last commit before versioned map layouts: its agent knows nothing of them and keeps its
/// maps where layout version 1's are pinned.
const BEFORE_VERSIONED_LAYOUTS: &str = "2a1bec2f722afd597c66e3f834b64a89fa0028d7";

/// The last commit of layout version 2 (before per-frontend counters).
const LAST_LAYOUT_2: &str = "106588085f25157e4d70a1def08679a9e8ee0d23";

/// How long the clients connect: longer than the restarts take (checked).
const WINDOW: Duration = Duration::from_secs(15);

/// The agent from before versioned layouts, then this tree's (another layout). Upgrade only: that
/// agent, started again over another layout's maps, would attach its programs before programming
/// the maps it then creates, and refuse connects for an instant; the README says to roll back to
/// a version with versioned layouts.
pub fn from_before_versioned_layouts() -> anyhow::Result<()> {
    let before = builds::agent_at_commit(BEFORE_VERSIONED_LAYOUTS)?;
    roll(
        &[&before, &agent::default_bin()],
        pins_of(&[1, LAYOUT_VERSION]),
    )
}

/// The last commit of layout 2, then this tree's (layout 3), then layout 2 again.
pub fn from_the_previous_layout_and_back() -> anyhow::Result<()> {
    let previous = builds::agent_at_commit(LAST_LAYOUT_2)?;
    let current = agent::default_bin();
    roll(
        &[&previous, &current, &previous],
        pins_of(&[2, LAYOUT_VERSION, 2]),
    )
}

/// This tree's agent, then the same agent built with a field added to a map value
/// (`layout-test`: the next layout version), then this one again. The upgrade fills the next
/// version's maps beside the current ones and removes those only once its programs are attached;
/// the rollback does the same the other way.
pub fn across_a_layout_change_and_back() -> anyhow::Result<()> {
    let changed = builds::agent_with_features(&["layout-test"])?;
    let current = agent::default_bin();
    roll(
        &[&current, &changed, &current],
        pins_of(&[LAYOUT_VERSION, LAYOUT_VERSION + 1, LAYOUT_VERSION]),
    )
}

/// A check that, with agent `i` running, only layout `versions[i]`'s maps are pinned.
fn pins_of(versions: &[u32]) -> impl Fn(&Testbed, usize) -> anyhow::Result<()> {
    let versions = versions.to_vec();
    move |tb, i| {
        let pinned = pinned_layouts(tb.pin_dir())?;
        ensure!(
            pinned == [versions[i]],
            "with agent {i} running, the pins hold layouts {pinned:?}, not only {}",
            versions[i]
        );
        Ok(())
    }
}

/// Runs `agents` one after the other over the same pins, under continuous connects; `check_pins`
/// looks at the pins with each one running.
fn roll(
    agents: &[&Path],
    check_pins: impl Fn(&Testbed, usize) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let pods = PodSpec::numbered("web", 3, &[HTTP]);
    let mut tb = testbed(&pods)?;
    tb.write_manifest("web.yaml", &web_manifest(&pods))?;
    tb.set_agent_bin(agents[0]);
    tb.start_agent()?;
    check_pins(&tb, 0)?;

    let started = std::time::Instant::now();
    let window = WINDOW.as_millis() as u64;
    let clients = [
        probe_web_for(&tb, window, 2)?,
        probe_web_for(&tb, window, 2)?,
    ];
    thread::sleep(Duration::from_millis(300));
    for (running, bin) in agents.iter().enumerate().skip(1) {
        tb.stop_agent()?;
        tb.set_agent_bin(bin);
        tb.start_agent()
            .with_context(|| format!("starting agent {running}, {}", bin.display()))?;
        check_pins(&tb, running)?;
        let maps = tb.listing()?;
        let web = maps
            .frontends
            .iter()
            .find(|row| row.service.name == "web")
            .with_context(|| format!("agent {running}'s maps have no web: {maps:?}"))?;
        ensure!(
            web.backends.len() == pods.len(),
            "agent {running}'s maps: {web:?}"
        );
        thread::sleep(Duration::from_millis(500));
    }
    ensure!(
        started.elapsed() + Duration::from_secs(1) < WINDOW,
        "the agents' restarts took {:?}, longer than the clients' window",
        started.elapsed()
    );
    for client in clients {
        let attempts = client.finish()?;
        let failed: Vec<&Attempt> = attempts.iter().filter(|a| a.answer.is_none()).collect();
        eprintln!(
            "a client made {} connects across the agents' restarts; {} failed",
            attempts.len(),
            failed.len()
        );
        ensure!(
            failed.is_empty(),
            "{} of {} connects failed, the first: {:?}",
            failed.len(),
            attempts.len(),
            failed.first()
        );
    }

    // The maps the last agent kept equal those it writes from scratch (but for the counters of
    // the clients' connects).
    let without_counters = |mut listing: lb_agent::list::Listing| {
        for row in &mut listing.frontends {
            row.counters = None;
        }
        listing
    };
    let kept = without_counters(tb.listing()?);
    tb.stop_agent()?;
    tb.agent_command(&["reset"])?;
    tb.start_agent()?;
    let fresh = without_counters(tb.listing()?);
    ensure!(
        kept == fresh,
        "the last agent's maps differ from a fresh start's:\n{kept:#?}\nfresh:\n{fresh:#?}"
    );
    Ok(())
}
