//! placeholder (mosquitto peer)
use crate::{Plan, Report};
pub(crate) async fn peer(_plan: &Plan, _report: &mut Report) -> anyhow::Result<()> {
    anyhow::bail!("not written yet")
}
