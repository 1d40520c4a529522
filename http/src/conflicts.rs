//! Conflicts as both APIs list them: a field whose merge rule keeps
//! concurrent writes (`review`, or `prefer` where the rule decided) and that
//! holds more than one, with every candidate and a stable id to resolve it by.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use fieldsync_shared::rules::{RuleState, Side};
use fieldsync_shared::{AgentId, Change, CollectionName, FieldName, FieldValue, RecordKey, Value};
use serde::Serialize;
use utoipa::ToSchema;

/// One field with concurrent values on record.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ConflictOut {
    /// Names the field (agent, collection, key, field) for
    /// `POST /v1/conflicts/{id}/resolve` on the hub.
    pub id: String,
    /// The agent whose record it is (on the hub's list only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    pub collection: String,
    pub key: String,
    pub field: String,
    /// `review` (open until resolved) or `prefer` (decided by the rule,
    /// kept on record).
    #[schema(example = "review")]
    pub rule: &'static str,
    /// The value a read shows now (`null`: deleted).
    #[schema(value_type = Object)]
    pub value: Value,
    /// Every concurrent value, oldest write first.
    pub candidates: Vec<CandidateOut>,
}

/// One concurrent write.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct CandidateOut {
    /// The value written (`null`: a delete).
    #[schema(value_type = Object)]
    pub value: Value,
    /// Who wrote it: an agent id, or `@name` for the hub.
    pub origin: String,
    /// `hub` or `agent`.
    #[schema(example = "agent")]
    pub side: &'static str,
}

fn json(v: &FieldValue) -> Value {
    match v {
        FieldValue::Set(v) => v.clone(),
        FieldValue::Deleted => Value::Null,
    }
}

fn side_name(side: Side) -> &'static str {
    match side {
        Side::Hub => "hub",
        Side::Agent => "agent",
    }
}

/// The conflicts one record holds (`agent` on the hub).
pub fn conflicts_of(agent: Option<&AgentId>, change: &Change) -> Vec<ConflictOut> {
    change
        .state
        .fields
        .iter()
        .filter(|(_, f)| f.candidates().len() > 1)
        .map(|(field, f)| {
            let rule = match f.rule {
                Some(RuleState::Review(_)) => "review",
                _ => "prefer",
            };
            ConflictOut {
                id: conflict_id(agent, &change.collection, &change.key, field),
                agent: agent.map(ToString::to_string),
                collection: change.collection.to_string(),
                key: change.key.to_string(),
                field: field.to_string(),
                rule,
                value: json(&f.value),
                candidates: f
                    .candidates()
                    .iter()
                    .map(|(v, value)| CandidateOut {
                        value: json(value),
                        origin: v.origin.to_string(),
                        side: side_name(Side::of(&v.origin)),
                    })
                    .collect(),
            }
        })
        .collect()
}

/// The id of a field's conflict: its address, as URL-safe base64 of a JSON
/// array (no state in it: the same field always has the same id).
pub fn conflict_id(
    agent: Option<&AgentId>,
    collection: &CollectionName,
    key: &RecordKey,
    field: &FieldName,
) -> String {
    let address = serde_json::json!([
        agent.map_or("", AgentId::as_str),
        collection.as_str(),
        key.as_str(),
        field.as_str()
    ]);
    URL_SAFE_NO_PAD.encode(address.to_string())
}

/// The address an id names, if it is one.
pub fn parse_conflict_id(id: &str) -> Option<(AgentId, CollectionName, RecordKey, FieldName)> {
    let bytes = URL_SAFE_NO_PAD.decode(id).ok()?;
    let [agent, collection, key, field]: [String; 4] = serde_json::from_slice(&bytes).ok()?;
    Some((
        AgentId::new(agent).ok()?,
        CollectionName::new(collection).ok()?,
        RecordKey::new(key).ok()?,
        FieldName::new(field).ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_name_the_field_and_read_back() {
        let agent = AgentId::new("gw-1").unwrap();
        let c = CollectionName::new("thermostat").unwrap();
        let k = RecordKey::new("t/1 é").unwrap();
        let f = FieldName::new("dose").unwrap();
        let id = conflict_id(Some(&agent), &c, &k, &f);
        assert!(id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert_eq!(parse_conflict_id(&id), Some((agent, c, k, f)));
        for bad in [
            "",
            "!!",
            "bm90IGpzb24",
            "WyJhIl0",
            &URL_SAFE_NO_PAD.encode("[\"\",\"c\",\"k\",\"f\"]"),
        ] {
            assert_eq!(parse_conflict_id(bad), None, "{bad}");
        }
    }
}
