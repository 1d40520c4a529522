//! placeholder (fleet connections)
use crate::{Plan, Report};
pub(crate) async fn connections(_plan: &Plan, _report: &mut Report) -> anyhow::Result<()> {
    anyhow::bail!("not written yet")
}
