//! Talking to the operator: confirmations and prompts, and choosing the members a command acts
//! on (patronictl's role filters, `--force` and the "which member?" questions).

use std::io::{BufRead, Write};

use anyhow::bail;
use chrono::{DateTime, FixedOffset};
use pgvigil_api::{ClusterView, Member};

use super::{print_members, python_datetime};

/// Reads one line of standard input after showing `question`; `None` when there is nothing to
/// read.
fn read_answer(question: &str) -> anyhow::Result<Option<String>> {
    print!("{question}");
    std::io::stdout().flush()?;
    let mut line = String::new();
    let n = std::io::stdin().lock().read_line(&mut line)?;
    if n == 0 {
        println!();
        return Ok(None);
    }
    Ok(Some(line.trim_end_matches(['\r', '\n']).to_string()))
}

fn no_answer(question: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "cannot ask \"{}\": standard input gave no answer (it is closed or not a terminal); \
         answer on standard input or use --force to skip confirmations",
        question.trim_end_matches([' ', ':', '?']).trim()
    )
}

/// `click.confirm`: `[y/N]`, anything but yes is no.
pub fn confirm(question: &str) -> anyhow::Result<bool> {
    loop {
        let Some(answer) = read_answer(&format!("{question} [y/N]: "))? else {
            return Err(no_answer(question));
        };
        match answer.trim().to_ascii_lowercase().as_str() {
            "y" | "yes" => return Ok(true),
            "" | "n" | "no" => return Ok(false),
            _ => println!("Error: invalid input"),
        }
    }
}

/// `click.prompt`: with a default, an empty answer takes it.
pub fn prompt(text: &str, default: Option<&str>) -> anyhow::Result<String> {
    loop {
        let question = match default {
            Some(d) => format!("{text} [{d}]: "),
            None => format!("{text}: "),
        };
        let Some(answer) = read_answer(&question)? else {
            return Err(no_answer(text));
        };
        if !answer.is_empty() {
            return Ok(answer);
        }
        if let Some(d) = default {
            return Ok(d.to_string());
        }
    }
}

/// patronictl's `--role` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RoleFilter {
    Leader,
    Primary,
    #[value(name = "standby-leader")]
    StandbyLeader,
    Replica,
    Standby,
    Any,
}

impl RoleFilter {
    pub fn name(self) -> &'static str {
        match self {
            RoleFilter::Leader => "leader",
            RoleFilter::Primary => "primary",
            RoleFilter::StandbyLeader => "standby-leader",
            RoleFilter::Replica => "replica",
            RoleFilter::Standby => "standby",
            RoleFilter::Any => "any",
        }
    }
}

/// Members with `role`, as patronictl's `get_all_members` picks them.
pub fn members_with_role(view: &ClusterView, role: RoleFilter) -> Vec<&Member> {
    let leader = view.leader_member();
    match role {
        RoleFilter::Leader | RoleFilter::Primary | RoleFilter::StandbyLeader => leader
            .filter(|m| {
                let r = m.data.role.as_str();
                match role {
                    RoleFilter::Leader => true,
                    RoleFilter::StandbyLeader => !matches!(r, "primary" | "master"),
                    _ => r != "standby_leader",
                }
            })
            .into_iter()
            .collect(),
        RoleFilter::Any => view.members.iter().collect(),
        RoleFilter::Replica | RoleFilter::Standby => view
            .members
            .iter()
            .filter(|m| Some(m.name.as_str()) != view.leader_name())
            .collect(),
    }
}

/// All members with an `api_url`, the leader first (where `pause`, `resume` and `flush` go).
pub fn members_leader_first(view: &ClusterView) -> Vec<&Member> {
    let leader = view.leader_member().filter(|m| !m.data.api_url.is_empty());
    let mut out: Vec<&Member> = leader.into_iter().collect();
    out.extend(
        view.members.iter().filter(|m| {
            !m.data.api_url.is_empty() && Some(m.name.as_str()) != leader.map(|l| l.name.as_str())
        }),
    );
    out
}

/// patronictl's `get_members`: the members named (or all with the role), after showing the
/// table; asks which member when none qualifies, then (optionally) for confirmation.
pub fn select_members<'a>(
    view: &'a ClusterView,
    scope: &str,
    names: &[String],
    role: RoleFilter,
    force: bool,
    action: &str,
    ask_confirmation: bool,
) -> anyhow::Result<Vec<&'a Member>> {
    let members = members_with_role(view, role);
    let candidates: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
    if names.is_empty() && candidates.is_empty() {
        bail!("{scope} cluster doesn't have any members");
    }
    print_members(scope, view);
    let mut chosen: Vec<String> = if !names.is_empty() {
        let chosen: Vec<String> = candidates
            .iter()
            .filter(|c| names.iter().any(|n| n == *c))
            .map(|c| c.to_string())
            .collect();
        if chosen.is_empty() {
            bail!("No {} among provided members", role.name());
        }
        chosen
    } else if action != "reinitialize" {
        candidates.iter().map(|c| c.to_string()).collect()
    } else {
        Vec::new()
    };
    if chosen.is_empty() && !force {
        chosen = vec![prompt(
            &format!(
                "Which member do you want to {action} [{}]?",
                candidates.join(", ")
            ),
            Some(""),
        )?];
    }
    for name in &chosen {
        if !candidates.contains(&name.as_str()) {
            bail!("{name} is not a member of cluster");
        }
    }
    let selected: Vec<&Member> = members.into_iter().filter(|m| chosen.contains(&m.name)).collect();
    if ask_confirmation {
        confirm_members_action(&selected, force, action, None, false)?;
    }
    Ok(selected)
}

/// patronictl's `confirm_members_action`.
pub fn confirm_members_action(
    members: &[&Member],
    force: bool,
    action: &str,
    scheduled_at: Option<&DateTime<FixedOffset>>,
    pending: bool,
) -> anyhow::Result<()> {
    if force {
        return Ok(());
    }
    let names = members
        .iter()
        .map(|m| m.name.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    match scheduled_at {
        Some(at) => {
            let question = if pending {
                "The nodes needing a restart will be identified at the scheduled time, and might be \
                 different from the ones showing pending restart right now. Is this fine?"
                    .to_string()
            } else {
                format!(
                    "Are you sure you want to schedule {action} of members {names} at {}?",
                    python_datetime(at)
                )
            };
            if !confirm(&question)? {
                bail!("Aborted scheduled {action}");
            }
        }
        None => {
            if !confirm(&format!("Are you sure you want to {action} members {names}?"))? {
                bail!("Aborted {action}");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::tests::view;

    fn names(v: Vec<&Member>) -> Vec<&str> {
        v.iter().map(|m| m.name.as_str()).collect()
    }

    #[test]
    fn role_filters() {
        let v = view();
        assert_eq!(names(members_with_role(&v, RoleFilter::Leader)), ["node2"]);
        assert_eq!(names(members_with_role(&v, RoleFilter::Primary)), ["node2"]);
        assert!(members_with_role(&v, RoleFilter::StandbyLeader).is_empty());
        assert_eq!(
            names(members_with_role(&v, RoleFilter::Replica)),
            ["node1", "node3"]
        );
        assert_eq!(names(members_with_role(&v, RoleFilter::Any)).len(), 3);
        assert_eq!(names(members_leader_first(&v)), ["node2", "node1", "node3"]);
        let mut unlocked = v.clone();
        unlocked.leader = None;
        assert!(members_with_role(&unlocked, RoleFilter::Leader).is_empty());
        assert_eq!(names(members_with_role(&unlocked, RoleFilter::Replica)).len(), 3);
    }

    #[test]
    fn selection_with_force() {
        let v = view();
        let all = select_members(&v, "c", &[], RoleFilter::Any, true, "restart", false).unwrap();
        assert_eq!(names(all).len(), 3);
        let some = select_members(
            &v,
            "c",
            &["node3".into(), "nodeX".into()],
            RoleFilter::Replica,
            true,
            "reload",
            true,
        )
        .unwrap();
        assert_eq!(names(some), ["node3"]);
        let err = select_members(
            &v,
            "c",
            &["node2".into()],
            RoleFilter::Replica,
            true,
            "reload",
            true,
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "No replica among provided members");
        // reinit without names and --force: nothing is chosen, nothing is asked.
        assert!(
            select_members(&v, "c", &[], RoleFilter::Replica, true, "reinitialize", true)
                .unwrap()
                .is_empty()
        );
        let empty = ClusterView::default();
        assert_eq!(
            select_members(&empty, "c", &[], RoleFilter::Any, true, "restart", false)
                .unwrap_err()
                .to_string(),
            "c cluster doesn't have any members"
        );
    }
}
