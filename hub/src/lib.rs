//! fieldsync-hub: the cloud side of Fieldsync (merging agents' changes, durable
//! per-agent downstream queues, the mTLS MQTT front door and the operator API).
//! Not built yet: this crate reserves its place in the workspace until the hub
//! issue lands.
