//! Pure decisions of the convergent steps (I1): given what the dataplane
//! reports (its JSON) and what is wanted, is the resource there and right
//! (adopt), there but wrong (replace), or absent (create)? No I/O here; the
//! agent performs what these functions decide.

use serde_json::Value;

/// What an observation found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observed {
    /// Present and exactly as wanted: adopt it.
    Matches,
    /// Present but unusable or different: tear down (and wait), then create.
    Differs(String),
    /// Not there: create.
    Absent,
}

/// The controller an engine wants to one replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WantCtrlr<'a> {
    pub traddr: &'a str,
    pub trsvcid: &'a str,
    pub subnqn: &'a str,
    pub hostnqn: &'a str,
}

/// Judges one entry of `bdev_nvme_get_controllers` (None: no such name).
pub fn controller(entry: Option<&Value>, want: &WantCtrlr<'_>) -> Observed {
    let Some(e) = entry else {
        return Observed::Absent;
    };
    let Some(c) = e["ctrlrs"].get(0) else {
        return Observed::Differs("no path".into());
    };
    let state = c["state"].as_str().unwrap_or("");
    let t = &c["trid"];
    let host = c["host"]["nqn"].as_str().unwrap_or("");
    if host != want.hostnqn {
        return Observed::Differs(format!("host NQN {host} is not {}", want.hostnqn));
    }
    if t["traddr"] != want.traddr || t["trsvcid"] != want.trsvcid || t["subnqn"] != want.subnqn {
        return Observed::Differs(format!(
            "transport ID {}:{}/{} is not {}:{}/{}",
            t["traddr"].as_str().unwrap_or(""),
            t["trsvcid"].as_str().unwrap_or(""),
            t["subnqn"].as_str().unwrap_or(""),
            want.traddr,
            want.trsvcid,
            want.subnqn
        ));
    }
    match state {
        "enabled" => Observed::Matches,
        // A controller that is reconnecting with the right identity will come
        // back by itself; replacing it would only race its own reconnect.
        "resetting" | "reconnect_is_delayed" => Observed::Matches,
        s => Observed::Differs(format!("state {s}")),
    }
}

/// A raid as the decision needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaidView {
    pub state: String,
    /// Members serving I/O (configured and not removed).
    pub operational: Vec<String>,
    /// Every member slot's bdev name that is configured or rebuilding.
    pub members: Vec<String>,
}

/// Reads a raid entry of `bdev_raid_get_bdevs`.
pub fn raid_view(entry: &Value) -> RaidView {
    let mut operational = Vec::new();
    let mut members = Vec::new();
    if let Some(list) = entry["base_bdevs_list"].as_array() {
        for b in list {
            let Some(n) = b["name"].as_str() else {
                continue;
            };
            members.push(n.to_string());
            let configured = b["is_configured"].as_bool().unwrap_or(false);
            let st = b["state"].as_str().unwrap_or("online");
            if configured && st == "online" {
                operational.push(n.to_string());
            }
        }
    }
    RaidView {
        state: entry["state"].as_str().unwrap_or("").to_string(),
        operational,
        members,
    }
}

/// Judges the engine's raid: adopt a serving raid whose members are all wanted
/// (a missing member means degraded, not wrong: tearing down a raid that serves
/// I/O would break I/O); replace one holding a foreign member or serving nothing.
pub fn raid(entry: Option<&Value>, want_members: &[String]) -> Observed {
    let Some(e) = entry else {
        return Observed::Absent;
    };
    let v = raid_view(e);
    if let Some(f) = v.members.iter().find(|m| !want_members.contains(m)) {
        return Observed::Differs(format!("member {f} is not one of this engine's"));
    }
    if v.operational.is_empty() {
        return Observed::Differs(format!("no operational member (state {})", v.state));
    }
    if v.state != "online" {
        return Observed::Differs(format!("state {}", v.state));
    }
    Observed::Matches
}

/// Judges an NBD export entry of `corral_nbd_list` (name, bdev_name).
pub fn nbd_export(entry: Option<&Value>, want_bdev: &str) -> Observed {
    let Some(e) = entry else {
        return Observed::Absent;
    };
    match e["bdev_name"].as_str() {
        Some(b) if b == want_bdev => Observed::Matches,
        b => Observed::Differs(format!("exports bdev {}", b.unwrap_or("?"))),
    }
}

/// What to do to a replica's subsystem.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubsystemPlan {
    pub create: bool,
    /// Namespaces (nsid) to remove: they expose something else.
    pub remove_ns: Vec<u64>,
    pub add_ns: bool,
    pub add_listener: bool,
    pub add_hosts: Vec<String>,
    /// Hosts to remove: this also disconnects their controllers (fencing).
    pub remove_hosts: Vec<String>,
    /// allow_any_host is on and must be turned off.
    pub disallow_any: bool,
}

/// Plans the replica subsystem from its `nvmf_get_subsystems` entry.
pub fn replica_subsystem(
    entry: Option<&Value>,
    want_bdev_names: &[&str],
    traddr: &str,
    trsvcid: &str,
    allowed: Option<&str>,
) -> SubsystemPlan {
    let mut p = SubsystemPlan::default();
    let Some(e) = entry else {
        p.create = true;
        p.add_ns = true;
        p.add_listener = true;
        p.add_hosts = allowed.map(|h| vec![h.to_string()]).unwrap_or_default();
        return p;
    };
    let mut have_ns = false;
    for n in e["namespaces"].as_array().into_iter().flatten() {
        let b = n["bdev_name"].as_str().unwrap_or("");
        if want_bdev_names.contains(&b) {
            have_ns = true;
        } else {
            p.remove_ns.push(n["nsid"].as_u64().unwrap_or(0));
        }
    }
    p.add_ns = !have_ns;
    p.add_listener = !e["listen_addresses"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|l| l["traddr"] == traddr && l["trsvcid"] == trsvcid);
    let hosts: Vec<String> = e["hosts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|h| h["nqn"].as_str().map(String::from))
        .collect();
    for h in &hosts {
        if Some(h.as_str()) != allowed {
            p.remove_hosts.push(h.clone());
        }
    }
    if let Some(a) = allowed {
        if !hosts.iter().any(|h| h == a) {
            p.add_hosts.push(a.to_string());
        }
    }
    p.disallow_any = e["allow_any_host"].as_bool().unwrap_or(false);
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ctrl(state: &str, port: &str, host: &str) -> Value {
        json!({"name": "v-r1", "ctrlrs": [{"state": state,
            "trid": {"trtype": "TCP", "traddr": "127.0.0.1", "trsvcid": port, "subnqn": "nqn.s"},
            "host": {"nqn": host}}]})
    }

    const W: WantCtrlr<'static> = WantCtrlr {
        traddr: "127.0.0.1",
        trsvcid: "4420",
        subnqn: "nqn.s",
        hostnqn: "nqn.h:e2",
    };

    #[test]
    fn controller_decisions() {
        assert_eq!(controller(None, &W), Observed::Absent);
        assert_eq!(
            controller(Some(&ctrl("enabled", "4420", "nqn.h:e2")), &W),
            Observed::Matches
        );
        assert_eq!(
            controller(Some(&ctrl("resetting", "4420", "nqn.h:e2")), &W),
            Observed::Matches
        );
        // The seed bug's leftovers: failed, deleting, an older epoch, another path.
        for (c, why) in [
            (ctrl("failed", "4420", "nqn.h:e2"), "state failed"),
            (ctrl("deleting", "4420", "nqn.h:e2"), "state deleting"),
            (ctrl("enabled", "4420", "nqn.h:e1"), "host NQN nqn.h:e1"),
            (ctrl("enabled", "4421", "nqn.h:e2"), "transport ID"),
        ] {
            match controller(Some(&c), &W) {
                Observed::Differs(r) => assert!(r.contains(why), "{r}"),
                o => panic!("{o:?} for {c}"),
            }
        }
    }

    fn raid_entry(state: &str, members: &[(&str, bool)]) -> Value {
        json!({"name": "v", "state": state, "base_bdevs_list":
            members.iter().map(|(n, c)| json!({"name": n, "is_configured": c})).collect::<Vec<_>>()})
    }

    #[test]
    fn raid_decisions() {
        let want = vec!["a".to_string(), "b".to_string(), "c".to_string()];
        assert_eq!(raid(None, &want), Observed::Absent);
        assert_eq!(
            raid(
                Some(&raid_entry(
                    "online",
                    &[("a", true), ("b", true), ("c", true)]
                )),
                &want
            ),
            Observed::Matches
        );
        // Degraded (a member dropped) is adopted, not torn down.
        assert_eq!(
            raid(
                Some(&raid_entry("online", &[("a", true), ("b", false)])),
                &want
            ),
            Observed::Matches
        );
        assert!(matches!(
            raid(
                Some(&raid_entry("online", &[("a", true), ("x", true)])),
                &want
            ),
            Observed::Differs(_)
        ));
        assert!(matches!(
            raid(Some(&raid_entry("offline", &[("a", false)])), &want),
            Observed::Differs(_)
        ));
    }

    #[test]
    fn subsystem_plans() {
        let p = replica_subsystem(None, &["d/r"], "127.0.0.1", "4420", Some("nqn.h:e1"));
        assert!(p.create && p.add_ns && p.add_listener);
        assert_eq!(p.add_hosts, vec!["nqn.h:e1"]);
        let e = json!({"namespaces": [{"nsid": 1, "bdev_name": "d/r"}, {"nsid": 2, "bdev_name": "other"}],
            "listen_addresses": [{"traddr": "127.0.0.1", "trsvcid": "4420"}],
            "hosts": [{"nqn": "nqn.h:e1"}], "allow_any_host": false});
        let p = replica_subsystem(
            Some(&e),
            &["d/r", "uuid-x"],
            "127.0.0.1",
            "4420",
            Some("nqn.h:e2"),
        );
        assert!(!p.create && !p.add_ns && !p.add_listener);
        assert_eq!(p.remove_ns, vec![2]);
        assert_eq!(p.add_hosts, vec!["nqn.h:e2"]);
        assert_eq!(
            p.remove_hosts,
            vec!["nqn.h:e1"],
            "the old epoch is fenced off"
        );
    }
}
