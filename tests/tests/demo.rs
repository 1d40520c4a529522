//! The README's demo command, run as a test: it must finish, exit 0, and show
//! each step (the local-only fields kept off the hub, the queued changes
//! delivered after the agent came back).

use std::process::Command;
use std::time::Duration;

use fieldsync_e2e::output_within;

#[test]
fn the_demo_runs_to_the_end() {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fieldsync-demo"));
    cmd.env("NO_COLOR", "1");
    let out = output_within(cmd, Duration::from_secs(300)).unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "demo failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    for expected in [
        "hub copy: {\"initials\":\"JD\",\"ward\":3}",
        "ssn and notes stayed on the device",
        "queued for gw-north: 3",
        "gw-north settings/s1: {\"mode\":\"away\"}",
        "gw-south GET settings/s1 -> 404",
        "Demo complete",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in:\n{stdout}"
        );
    }
}
