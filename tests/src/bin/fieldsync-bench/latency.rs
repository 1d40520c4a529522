//! placeholder (latency)
use crate::{Plan, Report};
pub(crate) async fn run(_plan: &Plan, _report: &mut Report) -> anyhow::Result<()> {
    anyhow::bail!("not written yet")
}
