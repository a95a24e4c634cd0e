//! Upgrades and rollbacks of the agent, as a DaemonSet rolling update makes them: the running
//! agent stops, another version starts over the same pins, then the first comes back. Two clients
//! connect without pause the whole time; none may fail, and the maps end up as a fresh start of
//! the version left running would write them.

use std::{path::Path, thread, time::Duration};

use anyhow::{Context as _, ensure};
use xtask::testbed::{PodSpec, Testbed, agent, builds, probe::Attempt};

use super::{HTTP, probe_web_for, testbed, web_manifest};

/// The last commit before versioned map layouts: its agent knows nothing of them and keeps its
/// maps where layout version 1's are pinned.
const BEFORE_VERSIONED_LAYOUTS: &str = "2a1bec2f722afd597c66e3f834b64a89fa0028d7";

/// How long the clients connect: longer than the two restarts take (checked).
const WINDOW: Duration = Duration::from_secs(15);

/// The previous commit's agent, then this tree's, then the previous one's again (same layout).
pub fn from_the_previous_commit_and_back() -> anyhow::Result<()> {
    let previous = builds::agent_at_commit(BEFORE_VERSIONED_LAYOUTS)?;
    roll(&previous, &agent::default_bin(), |_, _| Ok(()))
}

/// This tree's agent (layout version 1), then the same agent built with a field added to a map
/// value (`layout-test`: version 2), then version 1 again. The upgrade fills version 2's maps
/// beside version 1's and removes those only once its programs are attached; the rollback does
/// the same the other way.
pub fn across_a_layout_change_and_back() -> anyhow::Result<()> {
    let changed = builds::agent_with_features(&["layout-test"])?;
    roll(&agent::default_bin(), &changed, |tb, running| {
        let v1 = tb.pin_dir().join("LB4_SERVICES");
        let v2 = tb.pin_dir().join("v2");
        let (want_v1, want_v2) = match running {
            Running::First => (true, false),
            Running::Second => (false, true),
        };
        ensure!(
            v1.exists() == want_v1 && v2.join("LB4_SERVICES").exists() == want_v2,
            "with the {running:?} agent running: version 1's maps {}, version 2's {}",
            if v1.exists() { "pinned" } else { "gone" },
            if v2.exists() { "pinned" } else { "gone" },
        );
        Ok(())
    })
}

#[derive(Clone, Copy, Debug)]
enum Running {
    First,
    Second,
}

/// Runs `first`, upgrades to `second`, rolls back to `first`, under continuous connects;
/// `check_pins` looks at the pins with each version running.
fn roll(
    first: &Path,
    second: &Path,
    check_pins: impl Fn(&Testbed, Running) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let pods = PodSpec::numbered("web", 3, &[HTTP]);
    let mut tb = testbed(&pods)?;
    tb.write_manifest("web.yaml", &web_manifest(&pods))?;
    tb.set_agent_bin(first);
    tb.start_agent()?;
    check_pins(&tb, Running::First)?;

    let started = std::time::Instant::now();
    let window = WINDOW.as_millis() as u64;
    let clients = [
        probe_web_for(&tb, window, 2)?,
        probe_web_for(&tb, window, 2)?,
    ];
    thread::sleep(Duration::from_millis(300));
    for (bin, running) in [(second, Running::Second), (first, Running::First)] {
        tb.stop_agent()?;
        tb.set_agent_bin(bin);
        tb.start_agent()
            .with_context(|| format!("starting the {running:?} agent, {}", bin.display()))?;
        check_pins(&tb, running)?;
        let maps: lb_agent::list::Listing = serde_json::from_str(&listing(&tb)?)?;
        let web = maps
            .frontends
            .iter()
            .find(|row| row.service.name == "web")
            .with_context(|| format!("the {running:?} agent's maps have no web: {maps:?}"))?;
        ensure!(
            web.backends.len() == pods.len(),
            "the {running:?} agent's maps: {web:?}"
        );
        thread::sleep(Duration::from_millis(500));
    }
    ensure!(
        started.elapsed() + Duration::from_secs(1) < WINDOW,
        "the upgrade and the rollback took {:?}, longer than the clients' window",
        started.elapsed()
    );
    for client in clients {
        let attempts = xtask::testbed::probe::collect(client)?;
        let failed: Vec<&Attempt> = attempts.iter().filter(|a| a.answer.is_none()).collect();
        eprintln!(
            "a client made {} connects across the upgrade and the rollback; {} failed",
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

    // The maps the rolled-back agent kept equal those it writes from scratch.
    let kept = listing(&tb)?;
    tb.stop_agent()?;
    tb.agent_command(&["reset"])?;
    tb.start_agent()?;
    let fresh = listing(&tb)?;
    ensure!(
        kept == fresh,
        "the maps after the rollback differ from a fresh start's:\n{kept}\nfresh:\n{fresh}"
    );
    Ok(())
}

/// `lb-agent list -o json` of the running version, as text (the older agent's JSON has no layout
/// version; each comparison is between two listings of one binary).
fn listing(tb: &Testbed) -> anyhow::Result<String> {
    tb.agent_command(&["list", "-o", "json"])
}
