"""Rights policy templates: named rights that publishing licenses can reference."""

from rmsd import clusters, licenses
from rmsd.admin.common import Result, check_name, check_state
from rmsd.admin.store import opened
from rmsd.errors import RmsdError
from rmsd.schema import utcnow


def ensure_rights_template(
    *, cluster, name, database_url, database_password=None, rights=None, description="", state="present",
    check_mode=False,
) -> Result:
    """A named rights policy of cluster `cluster` that publishing licenses can reference."""
    check_name("cluster", cluster)
    check_name("template name", name)
    check_state(state, ("present", "absent"))
    description = description or ""
    if len(description) > 512:
        raise RmsdError("description is longer than 512 characters")
    if state == "present":
        try:
            rights = licenses.normalize_rights(rights or {})
        except RmsdError as err:
            raise RmsdError(f"rights of template {name!r}: {err}") from None
    with opened(database_url, database_password) as store:
        def current(conn):
            row = clusters.get_cluster(conn, cluster)
            if row is None:
                return None
            template = clusters.template_row(conn, row.id, name)
            return {} if template is None else template_view(template)

        found = store.read(current)
        if found is None:
            raise store.missing(cluster, "provision it first")
        if state == "absent":
            if not found:
                return Result(changed=False, facts={"template": {}})
            if not check_mode:
                with store.writing(cluster) as conn:
                    clusters.delete_template(conn, clusters.get_cluster(conn, cluster).id, name)
            return Result(changed=True, diff={"before": found, "after": {}}, facts={"template": {}})
        wanted = {"name": name, "description": description, "rights": rights}
        if found == wanted:
            return Result(changed=False, facts={"template": wanted})
        if not check_mode:
            with store.writing(cluster) as conn:
                row = clusters.get_cluster(conn, cluster)
                clusters.save_template(conn, row.id, name, description, rights, utcnow())
        return Result(changed=True, diff={"before": found, "after": wanted}, facts={"template": wanted})


def template_view(row) -> dict:
    return {"name": row.name, "description": row.description, "rights": row.rights}
