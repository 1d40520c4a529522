//! Fieldsync core shared by the agent and the hub: validated ids, hybrid logical
//! clocks, the record model and its merge rule, the egress policy, the wire format
//! and the sans-IO sync session, and the log format both programs share. No
//! async runtime, no storage, no sockets.

pub mod clock;
pub mod codec;
pub mod files;
pub mod history;
pub mod hlc;
pub mod id;
pub mod logging;
pub mod merge;
pub mod policy;
pub mod record;
pub mod rules;
pub mod schema;
pub mod session;
pub mod tls;
pub mod wire;

pub use hlc::{Hlc, HlcError, Stamp};
pub use id::{AgentId, CollectionName, FieldName, IdError, Origin, RecordKey};
pub use merge::Merge;
pub use policy::{Direction, Flow, Policy, PolicyError};
pub use record::{Change, Edit, EditError, FieldState, FieldValue, RecordState, Value, Version};
pub use rules::{FieldRule, MergeRule, RuleState, Side};
pub use session::{Cursor, Incarnation, Mark, Receiver, Sender, Seq, Session};
