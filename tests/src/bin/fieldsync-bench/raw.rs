//! placeholder (raw publish baseline)
use crate::{Plan, Report};
pub(crate) async fn baseline(_plan: &Plan, _report: &mut Report) -> anyhow::Result<()> {
    anyhow::bail!("not written yet")
}
